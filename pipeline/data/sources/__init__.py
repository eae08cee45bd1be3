"""Song sources: one adapter per dataset list/metadata format."""
