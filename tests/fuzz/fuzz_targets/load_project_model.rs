//! Project and model loading on arbitrary bytes. The first byte picks the file kind; for model
//! files the fuzzer's bytes get a valid checksum appended, so that it reaches the header and
//! weight parsers behind the checksum. Every input must give a value or an error, never a panic.
#![no_main]

use std::path::Path;

use inkspect::engine::device::cpu_device;
use inkspect::engine::model::ModelFile;
use inkspect::engine::model::file::container_checksum;
use inkspect::engine::project::Project;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("inkspect-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    match kind % 3 {
        0 => {
            let file = dir.join("p.inkspect");
            std::fs::write(&file, rest).unwrap();
            let _ = Project::load(&file);
        }
        1 => {
            // A model file with the magic and a correct checksum around the fuzzer's bytes.
            let mut bytes = b"INKSPECT-MODEL\0\0".to_vec();
            bytes.extend_from_slice(rest);
            let checksum = container_checksum(&bytes);
            bytes.extend_from_slice(&checksum.to_le_bytes());
            let _ = ModelFile::from_bytes(&bytes, Path::new("fuzz.ink"), &cpu_device().device);
        }
        _ => {
            let _ = ModelFile::from_bytes(rest, Path::new("fuzz.ink"), &cpu_device().device);
        }
    }
});
