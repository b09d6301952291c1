"""`poolsvc run-batch`: a whole file through the engine in this process, streamed and resumable.

config.py (the settings and CLI flags), inputs.py (reading rows ahead), texts.py (texts to
vectors) and openai.py (OpenAI batch request lines to response lines), outputs.py (the files
written), checkpoint.py (the resume state), progress.py, and run.py (the loop that ties them)."""
