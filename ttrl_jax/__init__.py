"""ttrl_jax: Test-Time Reinforcement Learning (TTRL) in JAX/Flax, from a laptop CPU to TPU pods.

The tree, in the order of the data's way through a step. A module imports only from its own
line and the lines above it, never inside a function, and no imports form a cycle
(tests/test_layers.py reads this list and checks it):

    sharding.py        the (data, model) mesh, the train and sample rules tables, host rows
    model/             the decoder: config and presets, the scanned model, attention, LoRA
    hf/                Hugging Face checkpoints: layout, load, export, gguf (GGUF files)
    data/              benchmarks, word problems, the toy task; chat prompts; the step's prompts
    sampling/          the sampling head, the one-token decode, the grouped sampler, rounds
    grading/           final answers in text, their equivalence and its worker, answer ids
    rl/                vote, rewards, advantages, losses, batch, log-probs, train step, budget
    config/            the run config: its sections (schema), YAML files and overrides (load)
    run/               set-up, rollouts, the step, the loop, evaluation, checkpoints, records
    plan/              TPU slices and the ahead-of-time plan: search, programs, timing, report
    bench/             benchmarks against PyTorch: forward, sample, train, upstream's step
    toy/               the toy tokenizer, its pretraining and the shipped model
    evaluate.py        the command python -m ttrl_jax.evaluate
    gguf.py            the command python -m ttrl_jax.gguf
    signal_report.py   the command python -m ttrl_jax.signal_report
    vote_replay.py     the command python -m ttrl_jax.vote_replay

Shape suffixes: an array's name ends in its axes, a capital letter each (`x_BTD`, `reward_PN`,
einsums like 'BTD,DQH->BTQH'), and a letter means the same everywhere:

    B  batch rows (P·N when sampling, P·M when training)    D  model width
    P  prompts                                              F  MLP hidden width
    N  responses per prompt (the vote's)                    V  vocabulary
    M  responses per prompt trained on                      L  layers
    U  groups of a sampling round (n rows of one prompt)    Q  query heads
    A  answer clusters of a prompt                          K  key/value heads
    T  prompt (query) length                                G  query heads per key/value head
    R  response length                                      H  head dim
    S  key/value length (cache slots)                       E  heads of one projection (Q, K)
    1, 2  an axis of that size

A lowercase letter is a tile of the capital one (t of T, s of S) or, as c, the positions of a
chunk (C chunks). A module that needs a letter for an axis of its own names it in its docstring
(sampling/decode.py, sampling/token_draw.py, sampling/rounds.py).
"""

import os

# transformers is used for tokenizers and chat templates only; its advice that PyTorch is
# missing (it is not needed here) would be the first line every run prints.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
