"""gptsan-demo: the whole GPTSAN workflow on a generated sample corpus."""
