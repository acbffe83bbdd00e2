//! age encryption of user secrets.
