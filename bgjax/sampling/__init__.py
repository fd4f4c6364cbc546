"""Generation: samplers matching diffusers', the host side (`host`, no JAX), the jitted program (`program`), the
memory estimate (`memory`), `BackgroundPipeline` (`pipeline`) and `bgjax generate` (`generate`)."""
