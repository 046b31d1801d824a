Feature: Requests the service receives more than once, or cannot accept
  Messages can arrive twice, the saga can ask again, and a request can be wrong. None of
  this ever charges a booking a second time.

  Background:
    Given the payment processor approves every charge

  Scenario: A duplicate delivery of a request is ignored
    Given the saga has requested a payment of 50.00 EUR for booking "BK-3001"
    When the same request message is delivered again
    Then nothing more is published for booking "BK-3001"
    And booking "BK-3001" was started once and told one outcome
    And booking "BK-3001" was charged exactly once

  Scenario Outline: An invalid request is rejected and nothing is charged
    When the saga requests <amount> minor units of "<currency>" for booking "<booking>" paid with "<method>"
    Then the saga is told the payment for booking "<booking>" failed because the request was invalid
    And no payment was started for booking "<booking>"
    And booking "<booking>" was never charged

    Examples:
      | problem                         | amount    | currency | booking | method              |
      | an amount of zero               | 0         | EUR      | BK-6001 | tok_visa            |
      | an amount above the maximum     | 100000001 | EUR      | BK-6002 | tok_visa            |
      | a currency that does not exist  | 1000      | XYZ      | BK-6003 | tok_visa            |
      | a currency in lowercase         | 1000      | eur      | BK-6004 | tok_visa            |
      | a card number instead of token  | 1000      | EUR      | BK-6005 | 4242 4242 4242 4242 |
      | no payment method               | 1000      | EUR      | BK-6006 |                     |
      | a booking id with a space       | 1000      | EUR      | BK 6007 | tok_visa            |

  Scenario: A card number sent instead of a token is rejected and never repeated
    When the saga requests a payment of 10.00 EUR for booking "BK-6101" paid with card number "4242 4242 4242 4242"
    Then the saga is told the payment for booking "BK-6101" failed because the request was invalid
    And booking "BK-6101" was never charged
    And nothing published for booking "BK-6101" contains the card number "4242 4242 4242 4242"

  Scenario Outline: Asking again for a finished booking returns the original outcome
    Given the payment processor <behaviour> every charge
    And the saga has requested a payment of 125.00 EUR for booking "BK-4001"
    And the saga was told the payment for booking "BK-4001" <outcome>
    When the saga asks again for 125.00 EUR for booking "BK-4001" in a new request
    Then the saga is told the same outcome again, with the same event id and content
    And booking "BK-4001" was charged exactly once

    Examples:
      | behaviour | outcome   |
      | approves  | completed |
      | declines  | failed    |

  Scenario: Asking again while the payment is still running waits for its outcome
    When the saga sends two requests for 60.00 EUR for booking "BK-4201" in quick succession
    Then booking "BK-4201" was started once and told one outcome
    And booking "BK-4201" was charged exactly once

  Scenario: Asking again for a different amount is set aside for an operator
    Given the saga has requested a payment of 125.00 EUR for booking "BK-4101"
    When the saga asks again for 130.00 EUR for booking "BK-4101" in a new request
    Then that request is set aside as a dead letter
    And booking "BK-4101" was started once and told one outcome
    And booking "BK-4101" was charged exactly once

  Scenario Outline: Asking again with a request that breaks a rule is set aside, not failed
    Given the saga has requested a payment of 125.00 EUR for booking "BK-4301"
    When the saga requests <amount> minor units of "<currency>" for booking "BK-4301" paid with "<method>"
    Then that request is set aside as a dead letter
    And booking "BK-4301" was started once and told one outcome
    And booking "BK-4301" was charged exactly once

    Examples:
      | problem                        | amount | currency | method              |
      | an amount of zero              | 0      | EUR      | tok_visa            |
      | a currency that does not exist | 12500  | XYZ      | tok_visa            |
      | a card number instead of token | 12500  | EUR      | 4242 4242 4242 4242 |
