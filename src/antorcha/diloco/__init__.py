"""DiLoCo's math, free of networking: parameter layout, pseudo-gradients, the outer optimizer,
checksums, the global state's serialized form and the inner training loop."""
