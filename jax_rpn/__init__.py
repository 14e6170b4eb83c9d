"""jax_rpn: the Region Proposal Network of Faster R-CNN as pure, jit-compiled JAX functions."""
