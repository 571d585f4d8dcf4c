"""The JAX backend: Flax NNX / linen / functional models, jitted SPMD steps, optax, orbax."""
