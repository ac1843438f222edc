"""Generation: sampling (sampling.py), prompts (prompt.py), cached decoding (decode.py), beam search
(beam.py), the --spout flag (spout.py) and the gptsan-generate / gptsan-languagemodel command lines."""
