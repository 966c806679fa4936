//! The changeset language.
