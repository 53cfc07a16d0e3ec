"""The ground floor: vocabulary every layer shares (types, seeding, text clean-up, chat formats,
errors, progress). It imports nothing else from the package."""
