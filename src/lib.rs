pub use brigade_engine as engine;
