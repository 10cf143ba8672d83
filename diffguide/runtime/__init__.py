"""What every layer may use of the machine: device and precision, torchrun ranks."""
