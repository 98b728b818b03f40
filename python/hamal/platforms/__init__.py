"""Platform adapters: snapshot, change query and cleanup for each platform. Adapters never
move disk data themselves; they hand the engine a source URI and its changes."""
