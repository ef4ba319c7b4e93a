// A module resolution hook: lets modules outside this directory (web/plait-sign.js) import
// the @noble packages installed here, as an import map lets a page do. Registered by
// sign_vector.mjs before it imports web/plait-sign.js.
export async function resolve(specifier, context, nextResolve) {
  if (specifier.startsWith('@noble/')) {
    return nextResolve(specifier, { ...context, parentURL: import.meta.url });
  }
  return nextResolve(specifier, context);
}
