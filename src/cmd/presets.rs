//! `brigade presets`: the model presets with their parameter and layer counts.

use anyhow::Result;

pub fn run() -> Result<()> {
    println!("{:<14} {:>15} {:>7}", "preset", "parameters", "layers");
    for name in brigade::models::preset_names() {
        let model = brigade::models::preset(name)?;
        println!("{name:<14} {:>15} {:>7}", model.num_params(), model.layers().len());
    }
    Ok(())
}
