// The provider and model picker, filled from GET /api/v1/providers. Unavailable providers
// are listed but disabled, with the server's reason.

import { api } from "./api.js";
import { el } from "./dom.js";

const optionValue = (provider, model) => JSON.stringify([provider, model]);

export class Picker {
  /** hooks: error(text) */
  constructor(select, hooks) {
    this.select = select;
    this.hooks = hooks;
    this.providers = [];
    this.defaultProvider = null;
  }

  async load() {
    try {
      const data = await api("GET", "/api/v1/providers");
      this.providers = data.providers;
      this.defaultProvider = data.default;
    } catch (err) {
      this.hooks.error(`Could not load providers: ${err.message}`);
      return;
    }
    this.render();
  }

  /** {provider, model} the server would use for a conversation without a choice. */
  defaultChoice() {
    const p = this.providers.find((x) => x.name === this.defaultProvider);
    return p ? { provider: p.name, model: p.default_model } : null;
  }

  render() {
    const groups = this.providers.map((p) => {
      const group = el("optgroup");
      group.label = p.available ? p.name : `${p.name} (unavailable: ${p.reason})`;
      group.dataset.provider = p.name;
      group.disabled = !p.available;
      for (const m of p.models.length ? p.models : [p.default_model]) {
        const opt = el("option", null, `${p.name} / ${m}`);
        opt.value = optionValue(p.name, m);
        opt.disabled = !p.available;
        if (!p.available) opt.title = p.reason || "unavailable";
        group.append(opt);
      }
      return group;
    });
    this.select.replaceChildren(...groups);
  }

  /** Select `choice`, adding it if the provider does not list that model. */
  show(choice) {
    if (!choice) return;
    const value = optionValue(choice.provider, choice.model);
    if (![...this.select.options].some((o) => o.value === value)) {
      const group = [...this.select.querySelectorAll("optgroup")].find(
        (g) => g.dataset.provider === choice.provider,
      );
      const opt = el("option", null, `${choice.provider} / ${choice.model}`);
      opt.value = value;
      (group || this.select).append(opt);
    }
    this.select.value = value;
  }

  /** The selected {provider, model}. */
  value() {
    const [provider, model] = JSON.parse(this.select.value);
    return { provider, model };
  }
}
