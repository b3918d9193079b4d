//! Schedule IR (being written).
