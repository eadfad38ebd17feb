"""Models in and out: dense models from the zoo, a folder, a GGUF file or the hub
(`load_model`), and the rankcut format for compressed ones (`save`, `load`)."""
