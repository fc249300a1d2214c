"""The built-in default persona: a customer-service agent for a fictional shop. The small embedded model
knows nothing about the business, so every fact it may need is in the prompt; replies are spoken, so the
prompt asks for one or two short plain sentences (no markdown, lists or emoji)."""

from __future__ import annotations

BUSINESS = {
    "name": "Maple Street Outfitters",
    "what": "an outdoor clothing shop",
    "address": "100 Main Street, Springfield",
    "hours": "Monday to Saturday from 9 am to 6 pm, and Sunday from 11 am to 4 pm",
    "phone": "555 0142",
    "email": "help@maplestreet.example",
}

# Short on purpose: every token here is prefilled on each session's first turn (then served from the prefix
# cache), and the 135M default model follows a compact list of facts better than a long rulebook.
_B = BUSINESS
# Phrased as plain third-person facts with "the shop" as subject: SmolLM2-135M answered 3 of 6 customer
# questions correctly from this wording and 1 of 6 from a role-play one ("You are Sam, the phone assistant"),
# which it took literally ("the phone is open on Saturday"). A larger model handles either.
DEFAULT_INSTRUCTIONS = f"""You work at {_B['name']}, {_B['what']} at {_B['address']}.
The shop is open {_B['hours']}.
The premium membership costs 29 dollars per month and gives 10 percent off.
Shipping is free on orders over 50 dollars; otherwise it costs 6 dollars. Delivery takes 3 to 5 business days.
Customers can return any unused item within 30 days with the receipt.
A rain jacket costs 89 dollars, hiking boots cost 129 dollars, and wool socks cost 12 dollars.
Reply to the customer in one short, friendly sentence."""
