//! Fails early, and says why, when the `cuda` feature is asked for on a
//! machine without the CUDA toolkit: otherwise the first sign is a CMake
//! error deep inside llama.cpp's build log.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=PATH");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let mut places: Vec<PathBuf> = ["CUDA_PATH", "CUDA_HOME"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|p| PathBuf::from(p).join("bin"))
        .collect();
    places.push(PathBuf::from("/usr/local/cuda/bin"));
    if let Some(path) = std::env::var_os("PATH") {
        places.extend(std::env::split_paths(&path));
    }
    if places.iter().any(|d| d.join("nvcc").is_file()) {
        return;
    }
    panic!(
        "the `cuda` feature builds llama.cpp's CUDA backend and needs the CUDA toolkit, \
         but no `nvcc` was found (looked in $CUDA_PATH/bin, $CUDA_HOME/bin, /usr/local/cuda/bin and $PATH). \
         Install the CUDA toolkit (12.x or 13.x) or build without `--features cuda`: \
         ONNX Runtime's CUDA provider needs no build feature. See docs/gpu-nodes.md."
    );
}
