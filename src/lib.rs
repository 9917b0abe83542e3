//! Inkspect: no-code visual anomaly detection.
//!
//! The [`engine`] holds everything that computes (project files, image import, datasets, models,
//! training, inspection, metrics) and never imports egui. The command line ([`cli`]) and the desktop
//! app drive the same engine.

pub mod bench;
pub mod cli;
pub mod engine;
#[cfg(feature = "app")]
pub mod ui;
