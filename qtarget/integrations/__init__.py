"""qtarget's losses inside other trainers. Each module imports its trainer: import it only where
that trainer is installed (``qtarget.integrations.tunix`` needs the tunix extra)."""
