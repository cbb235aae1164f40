//! One module per verb.
pub mod demo;
pub mod models;
pub mod run;
