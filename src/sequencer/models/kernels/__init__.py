"""Device-specific implementations behind the model code: oneDNN matmuls (CPU), the LSTM backends."""
