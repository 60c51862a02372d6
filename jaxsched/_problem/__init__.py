"""Problem layer: the loss, the noise covariance, x0 and the exact recursions."""
