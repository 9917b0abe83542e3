//! Image data: decoding files, importing them (files, folders, MVTec AD layout), and preparing
//! them for the model (downscaling, cache, train/validation split).

pub mod decode;
pub mod import;
pub mod prepare;
