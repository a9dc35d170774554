"""Networks: VAE, latent UNet, conditioning encoder, heads. They know nothing about training loops."""
