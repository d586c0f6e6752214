//! The steering control every latent gets wherever latents are listed (the reading's table, search results, the
//! card, SAIF's ranked list): a toggle that puts the latent in the steering set, and a slider of its strength, the
//! coefficient on its decoder row (the same number as in links and `saif steer`).

use leptos::prelude::*;

use super::state::AppState;

/// The finite number an input holds, if any.
pub fn input_f32(ev: &leptos::ev::Event) -> Option<f32> {
    event_target_value(ev).trim().parse::<f32>().ok().filter(|v| v.is_finite())
}

/// The largest strength the sliders offer for the SAE in use: about four residual-stream norms' worth.
pub fn strength_range(state: &AppState) -> f32 {
    let sae = state.sae.get();
    let scale = sae.map(|s| s.residual_norm / s.decoder_norm.max(1e-6)).unwrap_or(1.0);
    let raw = 4.0 * scale;
    // A round number: 1, 2 or 5 times a power of ten.
    let power = 10f32.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * power).find(|&v| v >= raw).unwrap_or(raw)
}

#[component]
pub fn SteerControl(
    index: u32,
    #[prop(optional)] tokens: Vec<String>,
    /// The strength a toggle starts at (SAIF's suggestion); a quarter of the range otherwise.
    #[prop(optional)]
    suggested: Option<f32>,
) -> impl IntoView {
    let state = expect_context::<AppState>();
    let tokens = StoredValue::new(tokens);
    let entry = move || state.steering.with(|s| s.get(index).cloned());
    let on = move || entry().is_some_and(|l| l.on);
    let range = move || strength_range(&state);
    let toggle = move |ev: leptos::ev::Event| {
        let checked = event_target_checked(&ev);
        state.steering.update(|s| {
            if checked {
                let strength = s.get(index).map(|l| l.strength).or(suggested).unwrap_or(range() / 4.0);
                s.put(index, strength, tokens.get_value());
            } else if let Some(l) = s.latents.iter_mut().find(|l| l.index == index) {
                l.on = false;
            }
        });
    };
    let set_strength = move |value: f32| {
        state.steering.update(|s| {
            let on = s.get(index).is_some_and(|l| l.on);
            s.put(index, value, tokens.get_value());
            if !on {
                if let Some(l) = s.latents.iter_mut().find(|l| l.index == index) {
                    l.on = true;
                }
            }
        })
    };
    view! {
        <span class="steer-control" data-latent=index>
            <label class="steer-toggle" title="Steer with this latent">
                <input type="checkbox" class="steer-on" prop:checked=on on:change=toggle
                    aria-label=format!("steer with latent {index}")/>
                " steer"
            </label>
            <input type="range" class="steer-strength" aria-label=format!("strength of latent {index}")
                prop:min=move || (-range()).to_string() prop:max=move || range().to_string()
                prop:step=move || (range() / 200.0).to_string()
                prop:value=move || entry().map_or(0.0, |l| l.strength).to_string()
                on:input=move |ev| if let Some(v) = input_f32(&ev) { set_strength(v) }/>
            <span class="strength">{move || entry().filter(|l| l.on).map(|l| format!("{:.3}", l.strength)).unwrap_or_default()}</span>
        </span>
    }
}
