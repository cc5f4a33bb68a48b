"""The network: the valid U-Net, its losses, checkpoints and the device it runs on."""
