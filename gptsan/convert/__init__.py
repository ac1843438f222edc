"""Model conversion (run_modelconvert.py semantics) and export to the original TF and HF formats."""
