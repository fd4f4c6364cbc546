"""Generation: samplers matching diffusers', the host side (`host`, no JAX), the jitted program (`program`), the
refill of the latents at a product's edge before decoding (`edge_fill`), the memory estimate (`memory`),
`BackgroundPipeline` (`pipeline`) and `bgjax generate` (`generate`)."""
