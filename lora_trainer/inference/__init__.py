"""Generation with trained adapters: `Generator` (txt2img, img2img, inpaint, outpaint, ControlNet,
SDXL refiner) over stacked or merged adapters, A1111 prompt weights, `sweep_grid`, `merge_to_folder`.
Modules: adapters, prompts, schedulers, pipelines, images, generate, sweep, merge, command (CLI flags)."""
