"""The CLAP teacher: load, convert a LAION checkpoint, fetch, and the demo teacher."""
