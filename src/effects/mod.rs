//! Thin effect modules: the only code that touches the system (nft, namespaces, files).
