"""Caption denoising from teacher ranks: `settings` (config.denoising) and `ranks` (the masks).

`tt_jax.denoising.ranks` imports the models; import it where masks are made, not from the config.
"""
