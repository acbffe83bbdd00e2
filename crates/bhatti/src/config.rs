//! Daemon configuration (`/var/lib/bhatti/config.yaml`).
