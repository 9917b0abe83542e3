//! The engine: project model, image import, dataset preparation, models, training, inspection and
//! metrics. No GUI code lives here.

pub mod demo;
pub mod metrics;
