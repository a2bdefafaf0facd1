"""Config files: each has get_config(scale) for scale in smoke / cpu / paper."""
