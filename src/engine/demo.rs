//! Synthetic wafer-die demo dataset (being written).
