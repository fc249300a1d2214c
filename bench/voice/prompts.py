"""Built-in caller utterances: short customer-service questions, spoken by the embedded Piper voice."""

PROMPTS = [
    "What time do you open on Saturday?",
    "I would like to check the status of my order.",
    "How much does the premium plan cost per month?",
    "Can I return a pair of shoes that I bought last week?",
    "Where is your nearest shop located?",
    "Do you offer free shipping on large orders?",
    "I need to change the delivery address for my package.",
    "My credit card was charged twice for the same order.",
    "Is the blue jacket available in a medium size?",
    "How long does delivery usually take?",
    "Can I speak with a manager please?",
    "I would like to cancel my subscription.",
]
