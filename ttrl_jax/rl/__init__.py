"""The RL maths of TTRL and its compiled train step: vote, rewards, advantages, losses."""
