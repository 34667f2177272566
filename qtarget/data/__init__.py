"""Training data: reasoning-gym and file builders, the packing pipeline, demonstrations with
worked steps, and the cached prior's on-disk rows."""
