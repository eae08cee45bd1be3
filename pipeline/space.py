"""The CLAP joint space the teacher and both students embed into."""

EMBED_DIM = 512  # LAION-CLAP's projection width (HTSAT-base audio and RoBERTa text towers alike)
