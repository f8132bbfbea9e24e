__version__ = "0.2.0"

# The stable-diffusion.cpp source this package is built from (vendor/pin.json).
ENGINE_VERSION = "master-596-90e87bc"
ENGINE_COMMIT = "90e87bc"
