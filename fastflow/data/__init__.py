"""Data: MVTec-layout loading, the synthetic category, validation anomalies, the feature cache, the download and the
paper's reference numbers. May import runtime."""
