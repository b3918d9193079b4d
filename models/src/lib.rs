//! brigade-models: GPT-2 and ResNet as ordered layer lists the engine can partition, and the
//! datasets they train on (including embedded defaults that need no download).

pub mod data;
pub mod gpt;
pub mod resnet;
