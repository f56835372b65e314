"""Help texts and choices that several commands share."""

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
DEVICE_HELP = ("auto (a CUDA GPU when torch sees one, else the CPU) | cpu | cuda | cuda:N: where the networks run; "
               "compiled artifacts are used when built for that device's target.")
TINY_VAE_DIR_HELP = ("Folder of tiny decoders, DIR/<family>/ each (sd1, sd2, sdxl; diffusers AutoencoderTiny: TAESD, "
                     "TAESDXL) (default: SDAOT_TINY_VAE_DIR); the built-in weights have random ones.")
CONTROLNET_DIR_HELP = ("Folder of ControlNet downloads, DIR/<name>/ each (default: SDAOT_CONTROLNET_DIR); "
                       "needed with real model weights only.")
LORA_DIR_HELP = "Folder of LoRA .safetensors files (default: SDAOT_LORA_DIR)."
