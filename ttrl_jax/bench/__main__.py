from ttrl_jax.bench import main

main()
