"""Released models: reading and writing checkpoints in this project's and the original formats."""
