"""Image domains as tasks (DomainNet layout, digits domains, vision models)."""
