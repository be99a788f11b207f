"""The torch side of the platform: architectures, optimizers, dataset loaders."""
